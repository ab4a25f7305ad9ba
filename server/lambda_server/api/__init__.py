"""The gRPC face of the service: servicer, proto <-> domain conversion, error mapping."""
