"""Commands whose code lives in other subpackages, added to the group here."""

from __future__ import annotations

import click


def register_extra(group: click.Group) -> None:
    from .bench import bench_command

    group.add_command(bench_command)
