"""
twisted-nbd: a Network Block Device server on Twisted.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
