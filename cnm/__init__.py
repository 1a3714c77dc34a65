"""cnm: the command-line front end. It wires `pipeline`, `trainer` and `bench`; no logic lives here."""

__version__ = "0.1.0"
