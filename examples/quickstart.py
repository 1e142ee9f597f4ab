"""The main job, offline: the embedded default model (SmolLM2-135M-Instruct in llama.cpp) calls a weather tool.

    python examples/quickstart.py

No server and no network: with no base URL configured, `Conversation()` runs the bundled model in-process. It
prints the call, the tool's result and the answer grounded in it.
"""

from __future__ import annotations

from weather import get_weather

from functionary_agent import Conversation
from functionary_agent.events import FinalAnswer, ToolResult


def main() -> None:
    chat = Conversation(tools=[get_weather])
    for event in chat.stream("What is the weather in Istanbul?"):
        if isinstance(event, ToolResult):
            print(f"call: {event.name}({event.arguments})")
            print(f"result: {event.content}")
        elif isinstance(event, FinalAnswer):
            print(f"answer: {event.content}")


if __name__ == "__main__":
    main()
