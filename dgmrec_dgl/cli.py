"""Command-line interface (filled in below)."""


def main(argv=None):  # pragma: no cover - replaced by the real CLI
    raise SystemExit("not yet")
