"""The tools and requests that the vLLM suite (tests/test_server_vllm.py) and benchmarks/server.py both send: one
varied set, so the benchmark measures what the tests check. Plain data, no test dependencies."""

from __future__ import annotations

from typing import Any

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Search flights between two airports",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string"}, "destination": {"type": "string"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["origin", "destination"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "subject": {"type": "string"}, "urgent": {"type": "boolean"}}, "required": ["to", "subject"]}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
# Calls stay few and arguments short: a 135M model otherwise calls, or writes a string, until max_tokens cuts it.
BOUNDS = {"functionary_max_calls": 3, "functionary_max_items": 4, "functionary_max_length": 48}
REQUESTS = [
    "What is the weather in Paris?", "Add 2 and 3.", "Find flights from IST to JFK for 2 people.",
    "Email bob@example.com with the subject Hello.", "How warm is it in Tokyo in fahrenheit?", "What is 17 plus 25?",
    "Book me a flight from London to Rome.", "Send an urgent email to alice@x.org about the meeting.",
    "Is it raining in Berlin?", "Sum 100 and 250", "Flights from SFO to LAX?", "Tell me a joke.",
    "Weather in Madrid please", "What's 9+10?", "Any flights from Paris to Oslo for 3?",
    "Write to dan@z.com: subject Report.", "Hello!", "Temperature in Cairo in celsius?", "Add -5 and 7",
    "I need flights from Tokyo to Seoul",
]
