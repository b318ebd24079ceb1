"""gRPC edge: servicers translate protobuf <-> domain; the interceptor does the rest."""
