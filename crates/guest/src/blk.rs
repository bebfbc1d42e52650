//! virtio-blk endpoint driver (being written).
