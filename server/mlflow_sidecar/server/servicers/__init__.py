"""gRPC servicers: proto <-> domain conversion around the services, nothing else."""
