"""scikit-learn's own estimator checks, run on both estimators' scikit-learn face."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from streamcoke import OnlineConstrainedKMeans

# Checks expected to fail, each with the reason. Everything else must pass.
EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data": (
        "fit visits the data in shuffled mini-batches and seeds with k-means++ on a random "
        "subset, so repeating a row is not the same as doubling its weight (scikit-learn's own "
        "MiniBatchKMeans is in the same position)"
    ),
}


def _expected_failed_checks(estimator):
    return EXPECTED_FAILURES


@parametrize_with_checks(
    [OnlineConstrainedKMeans(n_clusters=3, random_state=0),
     OnlineConstrainedKMeans(n_clusters=3, metric="euclidean", max_size_ratio=2.0, random_state=0)],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
