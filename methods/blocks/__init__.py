"""Building blocks shared by several methods (like timm's layers): trunks, heads, losses, patch grids."""
