"""runwire's shared package: the contract between scheduler, runner and gateway, in code."""

__version__ = "0.1.0"
