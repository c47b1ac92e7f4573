"""Resumable training checkpoints with orbax (DESIGN.md decision 10).

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``: save every N steps
and at the end, keep the last k, and restore the latest step by default. orbax writes
each step into a temporary directory and renames it when complete, and lists only
completed steps, so a run killed mid-save (even by SIGKILL) never resumes from a
half-written checkpoint: it resumes from the previous one and loses at most one save
interval.
"""

import os
import pathlib
from typing import Any

import jax


class Checkpointer:
    """Saves and restores the training state pytree under ``directory``.

    Args:
      directory: Where step directories are written (created if missing).
      save_interval_steps: Save only when ``step`` is a multiple of this (unless forced).
      max_to_keep: Completed checkpoints kept; older ones are deleted.
    """

    def __init__(
        self, directory: str | os.PathLike, *, save_interval_steps: int = 100, max_to_keep: int = 3
    ):
        import orbax.checkpoint as ocp  # Lazy: only training needs it.

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, create=True
            ),
        )

    @property
    def latest_step(self) -> int | None:
        """The newest completed checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` at ``step`` if the interval says so (or ``force``); async.

        A step that is already saved is not saved again (e.g. the final forced save right
        after an interval save).
        """
        if force:
            self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)

    def restore(self, like: Any, step: int | None = None) -> Any:
        """The state saved at ``step`` (default: latest), shaped and sharded like ``like``.

        ``like`` is a state or its ``jax.ShapeDtypeStruct`` tree.

        Raises:
          FileNotFoundError: No completed checkpoint in the directory.
        """
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no completed checkpoint in {self.directory}")
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def wait_until_finished(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
