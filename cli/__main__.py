"""`python -m cli ...` is the same as `minigpt ...`."""

from cli.main import app

app(prog_name="minigpt")
