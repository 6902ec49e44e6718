"""isoboxd's seccomp user-notify handlers: one module per syscall family, behind a
name-keyed registry (registry.py). The notify loop (notify.py) receives a notification,
builds a Call, asks the handler for a Verdict, answers the kernel and writes the audit line."""
