"""An ARM test double for the Azure backend's tests: see server.ArmDouble and tests/azure/conftest.py."""

from .azurite import Azurite, fixed_vhd, running_azurite
from .core import ArmError, Fault, Latency
from .server import ArmDouble

__all__ = ["ArmDouble", "ArmError", "Azurite", "Fault", "Latency", "fixed_vhd", "running_azurite"]
