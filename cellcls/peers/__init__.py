"""Other frameworks' training of the tutorial network, run by `cellcls.bench` in subprocesses.

Each peer is a standalone script (numpy and its framework only, no cellcls or torch), so it can
run under another Python (`bench.peer_python`) and never shares threads with PyTorch.
"""
