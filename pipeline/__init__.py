"""Streaming side of glad-stream: the `glad` command line today; Redis streams, message schema,
stage runner and embedded Redis as the streaming pipeline lands."""
