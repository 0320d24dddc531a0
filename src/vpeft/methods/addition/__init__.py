"""Addition-based methods: new modules or tokens beside the frozen backbone."""
