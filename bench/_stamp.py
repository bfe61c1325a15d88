"""The header every benchmark prints first, so a result in bench/results/ says when, by
which command and by which code it was produced: the date, the command line, the git
commit and the `code_version` of every asset (what makes Dagster re-mark it stale)."""

import datetime
import os
import subprocess
import sys
from pathlib import Path


def code_versions() -> dict[str, str]:
    from lqlora_dagster.definitions import build_definitions

    defs = build_definitions(Path("/tmp"))
    return {
        key.to_user_string(): version
        for asset in defs.assets
        for key, version in asset.code_versions_by_key.items()
        if version is not None
    }


def stamp() -> str:
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    versions = ", ".join(f"{k} {v}" for k, v in sorted(code_versions().items()))
    return "\n".join(
        [
            f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- commit: {commit.stdout.strip() or os.environ.get('LQLORA_COMMIT', 'unknown')}{' (with uncommitted changes)' if dirty else ''}",
            f"- code versions: {versions}",
        ]
    )


if __name__ == "__main__":
    print(stamp())
