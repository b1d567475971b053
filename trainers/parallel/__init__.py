"""Pipeline x tensor x data parallel training on torch.distributed (mesh, stages, TP plans)."""
