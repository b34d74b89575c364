"""The cloud <-> edge transport: the wire format (wire.py) and the Ray client (client.py)."""
