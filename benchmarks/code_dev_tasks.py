"""A development set for the code interpreter with the embedded model: `python benchmarks/code_tasks.py --dev`.

Small computations with known answers, worded and chosen apart from `code_tasks.TASKS` (the benchmark), so that
changes to the engine's code steering are tuned here and measured there. Never tune on the benchmark's 24 tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DevTask:
    prompt: str
    answer: float | str


DEV_TASKS = [
    DevTask("Using Python, what is the sum of the cubes of 1 through 6?", sum(i**3 for i in range(1, 7))),
    DevTask("Calculate 13 times 17 times 19 in Python.", 13 * 17 * 19),
    DevTask("With Python, find the largest of the numbers 31, 87, 45, 12 and 66.", max(31, 87, 45, 12, 66)),
    DevTask("What is 3 raised to the 9th power? Work it out in Python.", 3**9),
    DevTask("Use Python to count how many times the letter 's' appears in 'mississippi'.", "mississippi".count("s")),
    DevTask("Find the least common multiple of 12 and 18 using Python.", math.lcm(12, 18)),
    DevTask("Use Python to average the numbers 10, 20, 35 and 55.", (10 + 20 + 35 + 55) / 4),
    DevTask("Use Python to repeat the string 'ab' three times.", "ab" * 3),
    DevTask("In Python, divide 2500 by 8.", 2500 / 8),
    DevTask("How many seconds are there in one week? Calculate it in Python.", 7 * 24 * 60 * 60),
    DevTask("Use Python to add up the digits of 98765.", sum(int(d) for d in "98765")),
    DevTask("Using Python, what is 15 percent of 240?", 0.15 * 240),
    DevTask("How many characters, spaces included, does 'hello there friend' have? Use Python.",
            len("hello there friend")),
    DevTask("Use Python to find the 12th term of the sequence 3, 7, 11, 15, ... (it goes up by 4).", 3 + 4 * 11),
    DevTask("Make the string 'data science' title case with Python.", "Data Science"),
    DevTask("Use Python to compute the area of a circle of radius 3, rounded to two decimals.", round(math.pi * 9, 2)),
    DevTask("Compute 17 squared plus 4 squared in Python.", 17**2 + 4**2),
    DevTask("Use Python to find the absolute difference between 345 and 1012.", abs(345 - 1012)),
]
