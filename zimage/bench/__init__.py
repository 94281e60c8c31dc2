"""The GPU benchmark: plain diffusers beside zimage, each row in a fresh process."""
