"""Online K-MLE updater and the versioned model registry. Empty until online updates land."""
