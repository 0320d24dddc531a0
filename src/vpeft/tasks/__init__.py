"""Tasks: what differs between applications (image or video classification).

A task opens a split of a data set, wraps the adapted backbone in what runs on a batch (the
backbone itself for images; frames through it, temporal pooling and its head for clips), gives
the loss and the fields a run's results carry. The trainer, checkpoints, bench and report ask the
task and never branch on it.

>>> task = make_task("video", frames=8, views=2)
>>> net = task.wrap(model)        # (B, T, C, H, W) clips -> (B, classes) logits
"""

from vpeft.tasks.base import TASKS, Task, make_task, task_names

__all__ = ["TASKS", "Task", "make_task", "task_names"]
