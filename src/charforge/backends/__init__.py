"""Image backends behind one protocol; adapters hold the wire formats."""
