"""A planner with two specialists, each its own agent: a researcher with a notes tool and a writer.

The planner calls the specialists as tools (`Conversation.as_tool`); each call runs on a fresh copy of the
specialist, so the two research calls of one turn run at once without sharing history. Offline, scripted models
play the three agents; with a server they are the server's model under three system prompts:

    python examples/research_team.py
    FUNCTIONARY_BASE_URL=http://127.0.0.1:8000/v1 python examples/research_team.py
"""

from __future__ import annotations

import json
import os

from functionary_agent import ChatModel, Conversation
from functionary_agent.testing import ScriptedModel, ScriptedRequest, call

NOTES = {
    "tea": "Tea was first drunk in China; the Dutch brought it to Europe around 1610.",
    "coffee": "Coffee spread from Yemen in the 15th century; Europe's first coffee house opened in Venice in 1645.",
}
QUESTION = "When did tea and coffee reach Europe? Write two sentences."


def search_notes(topic: str) -> str:
    """Look a topic up in the team's notes.

    Args:
        topic: One word, e.g. "tea".
    """
    return NOTES.get(topic.lower(), f"No notes on {topic}.")


def scripted_researcher(request: ScriptedRequest) -> dict[str, object]:
    last = request.messages[-1]
    if last["role"] == "tool":
        return {"content": last["content"]}
    topic = "tea" if "tea" in str(last["content"]).lower() else "coffee"
    return {"tool_calls": [call("search_notes", {"topic": topic})]}


def scripted_writer(request: ScriptedRequest) -> str:
    facts = str(request.messages[-1]["content"]).split("Facts:", 1)[-1].strip()
    return f"In short: {facts}"


def scripted_planner(request: ScriptedRequest) -> dict[str, object]:
    results = [m for m in request.messages if m["role"] == "tool"]
    if not results:
        tasks = ["Find when tea reached Europe.", "Find when coffee reached Europe."]
        return {"tool_calls": [call("researcher", {"task": task}) for task in tasks]}
    if len(results) == 2:
        facts = " ".join(str(m["content"]) for m in results)
        return {"tool_calls": [call("writer", {"task": f"Write two sentences from these facts. Facts: {facts}"})]}
    return {"content": str(results[-1]["content"])}


def models() -> tuple[ChatModel | str | None, ChatModel | str | None, ChatModel | str | None]:
    if os.environ.get("FUNCTIONARY_BASE_URL"):  # the server's model plays every part
        name = os.environ.get("FUNCTIONARY_MODEL")
        return name, name, name
    return ScriptedModel(scripted_planner), ScriptedModel(scripted_researcher), ScriptedModel(scripted_writer)


def main() -> None:
    planner_model, researcher_model, writer_model = models()
    researcher = Conversation(researcher_model, system="You research with search_notes and report facts only.",
                              tools=[search_notes])
    writer = Conversation(writer_model, system="You write short, plain sentences from the facts you are given.")
    planner = Conversation(planner_model, system="You plan: ask the researcher for facts, then the writer for text.",
                           tools=[researcher.as_tool("researcher", "Finds facts on a topic in the team's notes."),
                                  writer.as_tool("writer", "Writes text from facts.")])
    print(planner.submit(QUESTION))
    print(json.dumps(planner.last_usage.to_dict()))
    for agent in (planner, researcher, writer):
        agent.close()


if __name__ == "__main__":
    main()
