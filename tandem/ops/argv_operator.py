"""An Airflow operator that runs argument lists, never a shell string.

``BashOperator`` pastes rendered templates into ``bash -c``: a trigger-form param such as
``start = "$(touch /tmp/pwned)"`` then runs on the worker. Here every templated element stays one
argument of ``execve`` (through the standard provider's :class:`SubprocessHook`, which streams the
output to the task log and stops the process group on kill or timeout), so no value a user typed
is ever parsed as code. An element that renders to the empty string is dropped, so a template
like ``"{{ '--force' if params.force_promotion else '' }}"`` makes a flag optional.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from airflow.providers.standard.hooks.subprocess import SubprocessHook
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException


class ArgvOperator(BaseOperator):
    """Run ``commands`` (argument lists, templated element by element) one after the other.

    Parameters
    ----------
    commands : each an argv list; the task fails at the first non-zero exit.
    env : added to the worker's environment (templated too).
    cwd : working directory.
    """

    template_fields: Sequence[str] = ("commands", "env")

    def __init__(self, *, commands: list[list[str]], env: dict[str, str] | None = None,
                 cwd: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = commands
        self.env = env or {}
        self.cwd = cwd
        self._hook = SubprocessHook()

    def execute(self, context: Any) -> None:
        env = {**os.environ, **self.env}
        for argv in self.commands:
            result = self._hook.run_command([a for a in argv if a != ""], env=env, cwd=self.cwd)
            if result.exit_code != 0:
                raise AirflowException(f"{argv[:3]} exited with code {result.exit_code}")

    def on_kill(self) -> None:
        self._hook.send_sigterm()
