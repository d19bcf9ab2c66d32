"""CLI commands, one module each (face layer).

Each module keeps torch, zmq and other heavy imports inside its command function, so that
`partita plan --profile FILE` starts fast and never needs torch.
"""
