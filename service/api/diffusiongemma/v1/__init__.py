"""Generated gRPC stubs of the public API (see proto/)."""
