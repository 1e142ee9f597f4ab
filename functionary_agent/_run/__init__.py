"""The loop's machinery, one module per step of a turn: the run's loop and state (`loop.py`), running the calls
(`calls.py`), answers and output types (`answers.py`), approvals (`approvals.py`), the context-window budget
(`context_budget.py`), repeated failing calls (`repeats.py`), tracing (`tracing.py`), the code interpreter as the
`python` tool (`interpreter.py`, with the code phase in `code_cell.py`), sync tools in daemon threads
(`threads.py`) and conversations as tools (`agent_tool.py`); `config.py` holds the settings, `state.py` the run's
state, `model_step.py` and `call_step.py` the two steps of a turn. Private: the public face is
`functionary_agent`."""
