"""`python -m functionary_agent.cli`: the same command as the `functionary-agent` script."""

import sys

from functionary_agent.cli.app import main

sys.exit(main())
