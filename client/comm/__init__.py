"""Weight-transfer backends behind one interface (``base.Communicator``)."""
