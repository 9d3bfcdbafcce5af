"""GKA vision backbones for timm: the mixer, the scan orders and the registered models (``gka_*``)."""
from .gka import GKABlock, GKANet, checkpoint_filter_fn
from .mixer import GKAMixer
from .scan import DIRECTIONS, SCAN_ORDERS, ScanIndex, block_directions, clear_scan_cache, direction_order, scan_index

__all__ = [
    'GKANet', 'GKABlock', 'GKAMixer', 'checkpoint_filter_fn', 'DIRECTIONS', 'SCAN_ORDERS', 'ScanIndex',
    'block_directions', 'direction_order', 'scan_index', 'clear_scan_cache',
]
