"""One module per emulated /proc or /sys file; each exports render(ctx) -> bytes."""
