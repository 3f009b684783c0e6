"""Worker-side and operator-side library (import name ``eplbd.client``)."""
