"""``tessera init``: a starter project (features file and next steps) in a directory."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

#: the files written, from the package's ``starter`` folder
STARTER_FILES: tuple[str, ...] = ("features.yaml", "NEXT.md")


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."))
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
def init(directory: Path, force: bool) -> None:
    """Write a starter features.yaml (a commented example) and NEXT.md into DIRECTORY."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = [n for n in STARTER_FILES if (directory / n).exists()]
    if existing and not force:
        raise click.ClickException(
            f"{', '.join(str(directory / n) for n in existing)} already exist; "
            "pass --force to overwrite")
    starter = resources.files("tessera").joinpath("starter")
    for name in STARTER_FILES:
        (directory / name).write_text(starter.joinpath(name).read_text("utf-8"), "utf-8")
    click.echo(f"wrote {', '.join(str(directory / n) for n in STARTER_FILES)}; "
               f"next: `tessera features validate {directory / 'features.yaml'}`, "
               "then NEXT.md")
