"""Pipeline stages (capture, align, extract, score), one module each, thin over `glad` and
`pipeline`. Empty until the streaming pipeline lands."""
