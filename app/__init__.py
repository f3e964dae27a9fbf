"""The `glad` command: the CLI, `glad run`'s supervisor and the command helpers, on top of
stages, online, dashboard, pipeline and glad."""
