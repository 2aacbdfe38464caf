"""SemID's MONAI Label app library: task configs and infer tasks (thin adapters over `semid`)."""

#: The label tag de-identified volumes are stored under in the datastore: never MONAI Label's `original`
#: (a model's label) nor `final` (a person's reviewed label), which a de-identified image is neither.
DEID_TAG = "deid"
