"""Task registry access: the tasks themselves are registered in lmtune/registrations.py (one module
plus one line there is a new task)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lmtune.registry import tasks

if TYPE_CHECKING:  # base imports torch; the package itself stays light, so its config modules read without it
    from lmtune.tasks.base import Task


def register(name: str, target: str) -> None:
    """Register a task class given as 'module:Class' (imported only when used)."""
    tasks.register(name, target)


def get_task(name: str) -> Task:
    from lmtune.tasks.base import Task
    cls = tasks.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"task '{name}' is registered as {cls!r}, which is not a subclass of lmtune.tasks.base.Task")
    return cls()


def task_names() -> list[str]:
    return sorted(tasks.names())
