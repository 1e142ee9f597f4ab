"""The loop's machinery, one module per step of a turn: the run's loop and state (`loop.py`), running the calls
(`calls.py`), answers and output types (`answers.py`), approvals (`approvals.py`), the context-window budget
(`context_budget.py`), repeated failing calls (`repeats.py`), tracing (`tracing.py`), the code interpreter as the
`python` tool (`interpreter.py`) and conversations as tools (`agent_tool.py`). Private: the public face is
`functionary_agent`."""
