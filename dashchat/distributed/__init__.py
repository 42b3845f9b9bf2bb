"""Tensor parallelism over torch.distributed: process groups and collectives (group.py), where the
ranks run and starting them (launch.py), and the loop of a rank other than 0 (worker.py)."""
