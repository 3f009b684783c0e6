"""Wire protocol: msgspec messages and the tensor-frame codec (import name ``eplbd.proto``)."""
