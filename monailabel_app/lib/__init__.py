"""SemID's MONAI Label app library: task configs and infer tasks (thin adapters over `semid`)."""
