"""Privacy mechanisms that protect what leaves a site."""
