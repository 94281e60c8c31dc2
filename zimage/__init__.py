"""zimage: a self-hosted web studio for Z-Image-Turbo.

Importing the package does no work: no torch, no folders, no model.
"""

__version__ = "0.1.0"
