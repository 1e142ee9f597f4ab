"""Weather tools for the README command.

    functionary-agent run "What is the weather in Istanbul?" --tools examples/weather.py

The data is made up (no network here), but stable: the same city always gets the same weather, so answers can be
checked against the tool's result.
"""

from __future__ import annotations

import hashlib
from typing import Literal

_CONDITIONS = ["sunny", "partly cloudy", "cloudy", "light rain", "thunderstorms", "windy", "foggy", "snow"]


def get_weather(location: str, unit: Literal["c", "f"] = "c") -> dict:
    """Get the current weather in a city.

    Args:
        location: The city and, optionally, the country, e.g. "Istanbul" or "Hanoi, Vietnam".
        unit: Temperature unit: "c" for Celsius, "f" for Fahrenheit.
    """
    seed = int(hashlib.sha256(location.strip().lower().encode()).hexdigest(), 16)
    celsius = seed % 35 - 5
    temperature = celsius if unit == "c" else round(celsius * 9 / 5 + 32)
    return {
        "location": location,
        "temperature": temperature,
        "unit": unit,
        "condition": _CONDITIONS[seed % len(_CONDITIONS)],
    }
