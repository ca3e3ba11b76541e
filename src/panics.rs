//! The text of a caught panic, for the errors that report a thread's or a driver
//! call's panic instead of passing it on.

use std::any::Any;

/// The text of a panic's payload: its `&str` or `String` message, else a placeholder.
pub fn message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::message;
    use std::panic::catch_unwind;

    #[test]
    fn messages_of_each_payload() {
        let text = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(&*text), "plain");
        let n = 3;
        let formatted = catch_unwind(move || panic!("formatted {n}")).unwrap_err();
        assert_eq!(message(&*formatted), "formatted 3");
        let other = catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(message(&*other), "a panic without a message");
    }
}
