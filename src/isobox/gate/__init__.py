"""The Docker API gate: a proxy in front of dockerd's socket that enforces
/etc/isobox/policy.toml on every request that creates, changes or starts containers.

proxy.py   HTTP/1.1 forwarding (h11), streaming, hijacked connections, keep-alive
request.py what the proxy hands the rules (Request) and what they answer (Decision)
rules.py   the policy checks, one function per kind of request
gojson.py  request bodies parsed as dockerd parses them (Go's encoding/json)
"""
