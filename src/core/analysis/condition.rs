//! CEL conditions (`successCondition`, `failureCondition`) over a measured `result`.

/// A compiled CEL condition; equal when the texts are.
#[derive(Clone, Debug)]
pub struct Condition {
    text: String,
}

impl Condition {
    /// The condition as the user wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Condition {}

/// What one reading counts as, with the value and the reason as people read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub outcome: super::Outcome,
    pub value: String,
    pub detail: String,
}
