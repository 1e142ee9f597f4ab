"""Ask an OpenAI-compatible server (Functionary's, vLLM, llama.cpp) about the weather in two cities.

    FUNCTIONARY_BASE_URL=http://127.0.0.1:8000/v1 python examples/remote_weather.py

Both calls of the model's turn run at once; the events show them as they finish.
"""

from __future__ import annotations

from weather import get_weather

from functionary_agent import Conversation
from functionary_agent.events import FinalAnswer, ToolResult


def main() -> None:
    chat = Conversation(tools=[get_weather], system="Answer in one sentence.")
    for event in chat.stream("What is the weather in Istanbul and in Hanoi?"):
        if isinstance(event, ToolResult):
            print(f"{event.name}({event.arguments}) -> {event.content}")
        elif isinstance(event, FinalAnswer):
            print(event.content)


if __name__ == "__main__":
    main()
