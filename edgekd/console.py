"""The terminal every part of edgekd prints to.

One rich Console, so that the pipeline, the stages, the teacher's data and the command line share
its settings (width, colour, capture in tests). It imports nothing of edgekd.
"""

from rich.console import Console

console = Console()
