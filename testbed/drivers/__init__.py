"""Drivers: the only code that knows a virtualization technology (see base.Driver)."""
